"""Scale-out on Ray Serve: replicas that each hold one AsyncEngine and the single server's request path,
behind an ingress that routes by prefix/session affinity bounded by load (routing/)."""
