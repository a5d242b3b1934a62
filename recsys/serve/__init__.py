"""Serving: the four-stage `Recommender` over an artifacts directory."""

from recsys.serve.recommender import Recommendation, Recommender
from recsys.serve.requests import RequestError

__all__ = ["Recommendation", "Recommender", "RequestError"]
