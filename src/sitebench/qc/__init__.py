"""Upload-time quality-control gate: header checks for incoming scans."""
