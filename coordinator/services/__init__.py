"""Long-lived services behind the handlers that are neither intake nor inference.

:mod:`.routers` fits, stores and swaps router versions; :mod:`.expert_store` reads registered
experts back out of the blob store (for routers, screening and the engine); :mod:`.registry_cache`
remembers registry reads on the request path (auth, inference) until the registry changes;
:mod:`.node_keys` keeps the SuperLink's admitted SuperNode keys those of unrevoked contributors.
"""
