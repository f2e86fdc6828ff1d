"""Deployment: ``flcore server`` and ``flcore client`` as separate processes over gRPC with
mutual TLS (``flcore certs`` makes the federation's certificates).

The server runs the ordinary :class:`flcore.training.Training` with a
:class:`~flcore.deploy.server.NetworkRuntime`, so the trainer, the validation of
contributions and every plugin are the same as in a simulation; each client process runs
the ordinary :class:`flcore.client.Client`, so client-side hooks run where the data is.
"""
