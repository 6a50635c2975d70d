"""A driver above ``convert``: search prune ratio × precision × target × threads on Ray (``edgeres sweep``)."""
