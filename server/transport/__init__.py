"""The coordinator's network face: the gRPC ``Join`` service, the per-stream inbox that
routes and checks what workers send, worker authentication, and the weights as chunk streams.

Imports only :mod:`..state`; knows nothing of rounds.
"""
