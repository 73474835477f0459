# dfsfs with its FUSE dependencies: the `init` service of docker-compose.yml runs it to
# create the schema, the buckets and the first administrator. To mount inside a container,
# run it with /dev/fuse and CAP_SYS_ADMIN (README, "Beyond one machine").
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 libfuse3-dev pkg-config gcc \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY dfsfs ./dfsfs
RUN pip install --no-cache-dir . \
    && mkdir -p /var/lib/dfsfs /mnt/dfs

ENV DFSFS_DATA_DIR=/var/lib/dfsfs
ENTRYPOINT ["dfsfs"]
CMD ["--help"]
