"""Faces of the engine for outside worlds (LangChain, Discord). They import `chatbot`, never the reverse."""
