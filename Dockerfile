# mcpcord: a release build on Rust, run on slim Debian with Node.js (npx) and
# uv (uvx), so the MCP servers people use start inside the container.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, in their own cached layer: a build of the manifest with
# placeholder sources.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir -p src benches migrations \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/engine.rs \
    && cargo build --release --locked --bin mcpcord \
    && rm -rf src benches
COPY migrations migrations
COPY benches benches
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin mcpcord

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates nodejs npm python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/*
# uv and uvx from PyPI, in a venv of their own.
RUN python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check uv \
    && ln -s /opt/uv/bin/uv /usr/local/bin/uv && ln -s /opt/uv/bin/uvx /usr/local/bin/uvx
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin mcpcord \
    && mkdir -p /data /config && chown mcpcord:mcpcord /data
COPY --from=build /src/target/release/mcpcord /usr/local/bin/mcpcord
# A working default set of MCP servers; mount your own file over it.
COPY mcp.example.json /config/mcp.json

ENV DATABASE_URL=sqlite:///data/mcpcord.db \
    MCP_CONFIG=/config/mcp.json \
    HEALTH_FILE=/tmp/mcpcord.health
USER mcpcord
WORKDIR /home/mcpcord
VOLUME ["/data"]
# Healthy while the bot is connected to the Discord gateway.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["mcpcord", "health"]
# tini forwards SIGTERM from `docker stop` and reaps npx/uvx grandchildren.
ENTRYPOINT ["tini", "--", "mcpcord"]
CMD ["run"]
