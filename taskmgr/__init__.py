"""taskmgr's shared core: settings, the data layer (TaskStore, TaskService), the
message contracts and the RabbitMQ wrappers. Both the manager and the runners use it."""
