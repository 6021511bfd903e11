"""A small cluster in network namespaces for `lbctl demo`, the dataplane tests and the benchmarks:
node and pod namespaces, a client on a bridge, processes inside them (netns), Nodes, Pods and
Services through the API (kube), and the pods' HTTP/UDP echo server (server). Root only."""
