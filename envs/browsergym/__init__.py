"""BrowserGym (MiniWoB++) environment served through OpenEnv: see README.md in this folder.

Submodules are imported explicitly (`envs.browsergym.client`, `.pool`, ...) so that importing the
package stays cheap; clients never import `envs.browsergym.server`.
"""
