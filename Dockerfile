# One image for the Ray head (controller) and the Ray worker nodes (agents and trainer ranks).
FROM python:3.11-slim
WORKDIR /opt/herdsman
COPY pyproject.toml README.md ./
COPY herdsman herdsman
COPY trainer trainer
COPY agents agents
COPY orchestrator orchestrator
COPY runbooks runbooks
ARG PIP_EXTRA_ARGS=""
RUN pip install --no-cache-dir torch==2.13.0 ${PIP_EXTRA_ARGS} \
    && pip install --no-cache-dir -e .
ENV RAY_AUTH_MODE=token
