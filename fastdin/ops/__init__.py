"""One module per op: its input checks, backend table, autograd.Function and torch.library op.

backend.py holds the policy shared by every op (which backend runs, value checks), checks.py the
argument checks shared by the ops. `fastdin.functional` re-exports the public names.
"""
