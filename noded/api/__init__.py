"""The node's local HTTP API (aiohttp): thin routes over the stages. `app` builds the application
(auth, errors, the component registry); each routes module serves one stage.
"""
