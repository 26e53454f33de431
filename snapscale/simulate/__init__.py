"""The fleet simulator (`snapscale simulate`): a day of traffic on a GPU fleet, in virtual time,
through the scaler's policy and placement, the restorer's tier choice and the freezer's decision.

Only time and the hosts' work are simulated (tier latencies and cache behaviour come from a
profile); no production package imports this one (an import-linter contract says so).
"""
