"""A browser-free OpenEnv environment that replays a recorded MiniWoB page: see environment.py."""
