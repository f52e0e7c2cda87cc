"""Expert intake: receive an upload, check it against the base model and the policies, admit it.

:mod:`.receiver` stages a streamed upload and commits it; :mod:`.object_uploads` does the same
for bytes PUT straight into an S3 store. Before anything is committed, :mod:`.validation` checks
the files against :mod:`.base_model` (what every expert must fit) and :mod:`.privacy_policy`;
:mod:`.screening` runs the poisoning checks at commit (and, through the router service's hook,
again before each router fit).
"""
