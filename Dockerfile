# rasterkube operator and job image: the operator Deployment runs `rasterkube operator`; the same
# image is the Ray head/worker/job image for the kuberay backend (it contains Ray).
#   docker build -t ghcr.io/rasterkube/rasterkube:0.1.0 .
#
# GENERATED from the image recipe (operator/rasterkube_devstack/rasterkube_image.py) by
#   python -m rasterkube_devstack.rasterkube_image --dockerfile
# Do not edit by hand: the dev node builds the same recipe without Docker, and a test fails when
# this file and the recipe disagree.
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 rasterkube \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/rasterkube --create-home --shell /bin/bash rasterkube \
    && python3 -m venv --without-pip /opt/rasterkube \
    && echo 'export PATH=/opt/rasterkube/bin:$PATH' > /etc/profile.d/rasterkube.sh

ENV PATH=/opt/rasterkube/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/constraints.txt
COPY services services
COPY operator operator
# The project and its dependencies at the pinned versions; pip itself is not kept (the local
# build installs the same wheels without it).
RUN python3 -m venv /opt/rasterkube \
    && /opt/rasterkube/bin/python -m pip install --no-cache-dir -c requirements/constraints.txt '.[pmtiles]' \
    && /opt/rasterkube/bin/python -m pip uninstall -y pip \
    && rm -rf /src

LABEL org.opencontainers.image.source="rasterkube" \
      org.opencontainers.image.title="rasterkube"
USER 10001:10001
WORKDIR /home/rasterkube
EXPOSE 8080 9090
ENTRYPOINT ["rasterkube"]
CMD ["operator"]
