# The taskmgr image: one image, the command picks the process (manager, runner, feed).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY taskmgr ./taskmgr
COPY manager ./manager
COPY runners ./runners
COPY task_types ./task_types
COPY bench ./bench
COPY sql ./sql
RUN pip install --no-cache-dir .
ENTRYPOINT ["taskmgr"]
