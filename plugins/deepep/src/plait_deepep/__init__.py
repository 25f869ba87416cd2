"""plait-deepep: DeepEP token dispatch behind plait's TokenDispatcher interface."""
