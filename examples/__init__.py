"""Example downstream services built on the consumer kit (taskmgr.consumer)."""
