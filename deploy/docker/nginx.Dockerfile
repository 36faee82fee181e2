# nginx from Debian's packages (nginx-light), for hosts that cannot pull the official nginx image
# that deploy/docker-compose.yml names: build it and point the compose file at it,
#   docker build -f deploy/docker/nginx.Dockerfile -t sled-nginx .
#   SLED_NGINX_IMAGE=sled-nginx docker-compose -p sled -f deploy/docker-compose.yml up -d
# It reads its site from /etc/nginx/conf.d/*.conf as the official image does (compose mounts
# deploy/nginx/sled.conf there) and logs to the container's output. CI builds it on its local base.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
# wget for compose's health check, as in the official image; nothing fetched where the base has both.
# hadolint ignore=DL3008
RUN if ! command -v nginx >/dev/null || ! command -v wget >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends nginx-light wget \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && rm -f /etc/nginx/sites-enabled/default \
    && ln -sf /dev/stdout /var/log/nginx/access.log \
    && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 8080
# SIGQUIT: finish the requests in flight, then exit.
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
