"""plait-ep: expert parallelism — each rank holds a slice of the experts of every MoE layer
and exchanges (token, expert) rows with the others by all-to-all
(``plait_ep.dispatcher.AllToAllTokenDispatcher``)."""
