"""`tailserve gateway`: one OpenAI endpoint in front of many OpenAI-compatible backends.

config.py (the YAML file, validated), spawn.py (local `tailserve serve` backends), upstream.py (one
connection pool per backend, load polling), attempts.py (the attempt loop under one deadline),
relay.py (streaming passthrough), metrics.py, app.py (the routes), cli.py. The policy itself lives in
`tailserve.routing`.
"""
