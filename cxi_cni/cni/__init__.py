"""The CNI protocol layer: environment, version negotiation, results, errors. Knows nothing of CXI."""
