module server

go 1.25
