"""Deployment manifests for Kubernetes, rendered from one set of values (``recops manifests``).

- :mod:`recops.deploy.values`     the values (one dataclass per section) and the YAML loader
- :mod:`recops.deploy.objects`    names, labels, the recops environment, volumes, resources
- :mod:`recops.deploy.workloads`  namespace, volumes, Triton, the closed loop
- :mod:`recops.deploy.monitoring` ServiceMonitors, PrometheusRule, a plain Prometheus configuration
- :mod:`recops.deploy.kuberay`    RayCluster, the sweep config, the sweep RayJob
- :mod:`recops.deploy.render`     every file, written atomically
"""
