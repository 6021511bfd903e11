"""The node-side forwarder: Services + EndpointSlices → one nftables table (`lbctl`), VIP ownership
announced from one node per address, and kube-proxy's health-check contract for ETP=Local.

Data flow (each arrow a module):
  watch (Kubernetes caches) → desired (pure: objects → state) → render (pure: state → nft text)
  → apply (one atomic `nft -f` transaction); ownership (pure) → addresses (VIP/32, gratuitous ARP).
"""
