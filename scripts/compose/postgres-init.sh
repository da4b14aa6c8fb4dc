#!/bin/sh
# Runs once, when compose.yaml's TimescaleDB starts on an empty volume, as the image's
# superuser: the database is owned by taskmgr_owner (it runs the migrations), the
# service roles get their passwords, and the extension is created (it needs a
# superuser). No taskmgr process ever connects as the superuser.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<SQL
create role taskmgr_owner login createrole password '${TASKMGR_DB_PASSWORD_OWNER:?run scripts/gen-secrets}';
create role taskmgr_manager login password '${TASKMGR_DB_PASSWORD_MANAGER:?run scripts/gen-secrets}';
create role taskmgr_reader login password '${TASKMGR_DB_PASSWORD_READER:?run scripts/gen-secrets}';
create role taskmgr_api login password '${TASKMGR_DB_PASSWORD_API:?run scripts/gen-secrets}';
create role taskmgr_runner nologin;  -- runners hold no database credentials
grant taskmgr_manager, taskmgr_reader, taskmgr_api, taskmgr_runner to taskmgr_owner;
create database taskmgr owner taskmgr_owner;
SQL
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname taskmgr -c "create extension if not exists timescaledb"
