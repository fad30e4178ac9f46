"""Files users already have: MRC, RELION STAR, Leopard-EM CSV, cryoSPARC .cs."""
