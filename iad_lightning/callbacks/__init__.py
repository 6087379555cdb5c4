"""Lightning callbacks: anomaly-map visualisation."""
