"""The gRPC edge: servicers, the plain handler of each service, and the one status table.

A servicer (:mod:`.servicers`) turns protobuf into a call of a handler (``*_handler.py``, one per
service, no grpc import) and the handler's exceptions into status codes through :mod:`.status`;
:mod:`.convert` is the only place that knows both registry records and protobuf messages.
"""
