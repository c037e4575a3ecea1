"""The HTTP routes, one router per resource; `create_app` includes them all."""

from __future__ import annotations

from alignd.server.routes import chat, completions, health, models, rewards, tokens

ROUTERS = [health.router, models.router, completions.router, chat.router, rewards.router, tokens.router]
