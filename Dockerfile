# The taskmgr image: one image, the command picks the process (manager, runner, feed).
# Built as users get it: a wheel (which carries sql/ as taskmgr/sql), installed into a
# clean image with no source tree, run as an unprivileged user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY taskmgr ./taskmgr
COPY manager ./manager
COPY runners ./runners
COPY task_types ./task_types
COPY bench ./bench
COPY sql ./sql
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --no-create-home taskmgr
USER taskmgr
WORKDIR /tmp
ENTRYPOINT ["taskmgr"]
