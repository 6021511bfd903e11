# One image for the operator (`lbctl operator`) and the node forwarder (`lbctl forwarder`).
# The forwarder's BGP speaker, ExaBGP, is a Python dependency of lbctl: the wheels below carry it.
# The forwarder's DaemonSet runs it as root with only NET_ADMIN and NET_RAW; everything else runs
# as the unprivileged default user.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lbctl ./lbctl
COPY providers ./providers
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[aws,gce]"

FROM python:3.11-slim-bookworm
# nftables and conntrack for the forwarder's data path; iproute2 for looking at it by hand
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        nftables=1.0.6-2+deb12u2 iproute2=6.1.0-3 conntrack=1:1.4.7-1+b2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels "lbctl[aws,gce]==0.1.0" && rm -rf /wheels
USER 10001:10001
ENTRYPOINT ["lbctl"]
CMD ["--help"]
