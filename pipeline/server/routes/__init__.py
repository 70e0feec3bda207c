"""The dashboard's HTTP routes, one APIRouter per area: pages and sign-in, corpus views,
curation, annotation rounds, annotation work, administration."""
