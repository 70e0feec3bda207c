// annotation page (issue 9) is filled in below
