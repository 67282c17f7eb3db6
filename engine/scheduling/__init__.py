"""Scheduling and KV bookkeeping: requests' state, the block pool with its prefix cache, and the
token-budget scheduler. Plain Python: nothing here touches a device tensor."""
