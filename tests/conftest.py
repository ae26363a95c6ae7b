"""Shared fixtures: one session-scoped Ray cluster, tiny models built once per session.

Fixtures are added by the layers that need them (env, engines, learner, Ray); keep them cheap to
import: heavy imports go inside the fixture bodies.
"""
