//! JWT-SVIDs (stub).
