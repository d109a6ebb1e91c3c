"""Real Flower deployment on loopback: a SuperLink and SuperNodes as processes, with TLS, SuperNode
authentication and persistent state (``fedrank deploy certs | up | run | down | status``)."""
