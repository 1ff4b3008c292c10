"""Redis access, one store per role: the only modules that talk to Redis.

- :mod:`~cluster.stores.base`: what every role shares (the connection, key names, reads of requests,
  replicas and epochs, results and slice timings) and the errors callers retry on;
- :mod:`~cluster.stores.ingress`: the ingress (asynchronous): submit, cancel, read output, the snapshot;
- :mod:`~cluster.stores.dispatcher`: the dispatcher: its streams, results applied once, batches, replicas;
- :mod:`~cluster.stores.worker`: a worker replica: registration, heartbeat, its work stream;
- :mod:`~cluster.stores.admin`: the CLI, the bench harnesses and the tests: inspection, and submitting
  requests synchronously as an ingress would.

What they store is typed in :mod:`cluster.messages`; a store encodes and decodes, it never reads a field by name.
"""
