"""What every RPC passes before a servicer: one interceptor per concern, and the caller's limits.

:mod:`.metrics` (counts and times every call, installed first), :mod:`.auth` (token, role and the
per-credential inference limit of :mod:`.inference_limit`) and :mod:`.decoding` (unparseable
request bytes are INVALID_ARGUMENT). :mod:`.rate_limit` holds the token buckets and the
per-contributor upload limits, :mod:`.shared_limits` the buckets replicas on PostgreSQL share;
they sit here, beside auth, because every limit is keyed by the authenticated caller.
"""
