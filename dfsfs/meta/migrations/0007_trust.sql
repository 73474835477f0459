-- Migration 7: reserved for the trust model (account scoping derived by the server).
SELECT 1;
