"""The HTTP API and the web console of the Task Manager (`taskmgr api`): an operator's
front door over the core's TaskService and stores, with API tokens for auth. Built only
on the core; the CLI (the composition root) adds the sports routes (task_types/api.py)."""
