#!/bin/sh
# compose.yaml's one-shot `rabbitmq-users` service: creates the taskmgr users with the
# passwords from the environment (scripts/gen-secrets) and the permissions of
# scripts/rabbitmq-users, through the management API (as the admin user), then exits.
set -eu
api="http://rabbitmq:15672/api"
auth="$RABBITMQ_DEFAULT_USER:$RABBITMQ_DEFAULT_PASS"
grep -v '^#' /config/rabbitmq-users | while read -r user conf write read; do
  [ -n "$user" ] || continue
  var=$(echo "TASKMGR_RABBIT_PASSWORD_$user" | tr '[:lower:]' '[:upper:]')
  password=$(eval "printf %s \"\${$var:?$var is not set: run scripts/gen-secrets}\"")
  body=$(printf '{"password":"%s","tags":""}' "$password")
  curl -fsS -u "$auth" -X PUT -H 'content-type: application/json' -d "$body" "$api/users/$user" >/dev/null
  perms=$(printf '{"configure":"%s","write":"%s","read":"%s"}' "$conf" "$write" "$read" | sed 's/\\/\\\\/g')
  curl -fsS -u "$auth" -X PUT -H 'content-type: application/json' -d "$perms" "$api/permissions/%2F/$user" >/dev/null
  echo "rabbitmq user $user ready"
done
