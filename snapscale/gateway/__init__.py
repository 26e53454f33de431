"""The gateway: the request path. Routes each request to its deployment, balances it over the
ready replicas, holds it while none is ready (a scale-up from zero) and reports traffic to the
scaler. I/O in the service and the proxy; routing and the pool decide without any.
"""
