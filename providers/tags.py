"""The keys both cloud providers put on what they make (AWS tags, GCE descriptions), defined once: the
cluster's key (the cloud-provider convention: the key names the cluster, its value says "owned"), the
Service's name (as cloud-provider-aws and GKE write it) and the balancer lbctl made."""

from __future__ import annotations

#: followed by the cluster's name
CLUSTER_PREFIX = "kubernetes.io/cluster/"
#: "namespace/name" of the Service
SERVICE_NAME = "kubernetes.io/service-name"
#: which balancer a part (target group, rule, backend) belongs to
BALANCER = "lbctl.io/load-balancer"
