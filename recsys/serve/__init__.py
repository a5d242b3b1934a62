"""Serving: the four-stage `Recommender` over an artifacts directory."""

from recsys.serve.recommender import Recommendation, Recommender, RequestError

__all__ = ["Recommender", "Recommendation", "RequestError"]
