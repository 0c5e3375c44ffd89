"""The local dev stack: tooling, not control plane (DESIGN §1).

A Docker-free Kubernetes for trying rasterkube and for its end-to-end tests: control-plane
binaries built from the Go module proxy, a local Ray head, an S3-compatible server, CRDs and
the operator (``rasterkube dev up|down``). It lives beside ``rasterkube_operator`` so that the
operator package holds only what runs in the cluster."""
