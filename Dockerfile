# rasterkube operator and job image: the operator Deployment runs `rasterkube operator`; the same
# image is the Ray head/worker/job image for the kuberay backend (it contains Ray).
#   docker build -t ghcr.io/rasterkube/rasterkube:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# wget: KubeRay's liveness/readiness probes of Ray pods run `wget` inside the container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/constraints.txt
COPY services services
COPY operator operator
RUN pip install -c requirements/constraints.txt . \
    && rm -rf /src

# Numeric non-root user so that Kubernetes can verify runAsNonRoot (the chart also sets 10001).
RUN groupadd --system --gid 10001 rasterkube \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/rasterkube --create-home \
       --shell /bin/bash rasterkube
USER 10001:10001
WORKDIR /home/rasterkube

EXPOSE 8080 9090
ENTRYPOINT ["rasterkube"]
CMD ["operator"]
