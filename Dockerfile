# The memberflow worker image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY rules ./rules
COPY state ./state
COPY agents ./agents
COPY memberflow ./memberflow
RUN pip install --no-cache-dir . \
    && useradd --system --create-home --home-dir /var/lib/memberflow memberflow
# Unprivileged; Faust creates its data directory in the working directory: the user's own.
USER memberflow
WORKDIR /var/lib/memberflow
# Faust's web views (/metrics, /health) listen here.
EXPOSE 6066
ENTRYPOINT ["memberflow"]
CMD ["worker"]
