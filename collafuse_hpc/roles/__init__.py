"""The two roles: a client trains and samples below its cut on private data
(client.py); a server above the cuts (server.py)."""
