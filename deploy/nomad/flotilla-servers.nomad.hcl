# The Raft group: three servers on three distinct hosts, static ports, state on a host volume
# named "flotilla-server" on each (client config: host_volume "flotilla-server" { path = ... }).
# Server 1 bootstraps the cluster the first time; 2 and 3 join it. Run with the exec driver
# (the binary at /usr/local/bin/flotilla on every client) and TLS files under /etc/flotilla/tls.
job "flotilla-servers" {
  type = "service"

  constraint {
    operator = "distinct_hosts"
    value    = "true"
  }

  update {
    max_parallel = 1
    min_healthy_time = "10s"
    healthy_deadline = "2m"
  }

  group "s1" {
    count = 1
    network {
      port "grpc" { static = 7070 }
      port "http" { static = 7071 }
    }
    volume "data" {
      type      = "host"
      source    = "flotilla-server"
      read_only = false
    }
    task "server" {
      driver = "exec"
      config {
        command = "/usr/local/bin/flotilla"
        args    = ["server", "--config", "${NOMAD_TASK_DIR}/server.toml"]
      }
      volume_mount {
        volume      = "data"
        destination = "/var/lib/flotilla"
      }
      template {
        destination = "${NOMAD_TASK_DIR}/server.toml"
        data        = <<-EOT
          id = 1
          bootstrap = true
          data_dir = "/var/lib/flotilla/server"
          grpc_addr = "{{ env `NOMAD_ADDR_grpc` }}"
          http_addr = "{{ env `NOMAD_ADDR_http` }}"
          tls_cert = "/etc/flotilla/tls/server-s1.pem"
          tls_key = "/etc/flotilla/tls/server-s1-key.pem"
          tls_ca = "/etc/flotilla/tls/ca.pem"
        EOT
      }
      service {
        name     = "flotilla-server"
        port     = "http"
        provider = "nomad"
        check {
          type     = "http"
          path     = "/health"
          interval = "5s"
          timeout  = "2s"
        }
      }
      resources {
        cpu    = 1000
        memory = 512
      }
    }
  }

  group "s2" {
    count = 1
    network {
      port "grpc" { static = 7070 }
      port "http" { static = 7071 }
    }
    volume "data" {
      type      = "host"
      source    = "flotilla-server"
      read_only = false
    }
    task "server" {
      driver = "exec"
      config {
        command = "/usr/local/bin/flotilla"
        args    = ["server", "--config", "${NOMAD_TASK_DIR}/server.toml"]
      }
      volume_mount {
        volume      = "data"
        destination = "/var/lib/flotilla"
      }
      template {
        destination = "${NOMAD_TASK_DIR}/server.toml"
        data        = <<-EOT
          id = 2
          join = "{{ range nomadService `flotilla-server` }}{{ if eq .Port 7071 }}{{ .Address }}:7070{{ end }}{{ end }}"
          data_dir = "/var/lib/flotilla/server"
          grpc_addr = "{{ env `NOMAD_ADDR_grpc` }}"
          http_addr = "{{ env `NOMAD_ADDR_http` }}"
          tls_cert = "/etc/flotilla/tls/server-s2.pem"
          tls_key = "/etc/flotilla/tls/server-s2-key.pem"
          tls_ca = "/etc/flotilla/tls/ca.pem"
        EOT
      }
      resources {
        cpu    = 1000
        memory = 512
      }
    }
  }

  group "s3" {
    count = 1
    network {
      port "grpc" { static = 7070 }
      port "http" { static = 7071 }
    }
    volume "data" {
      type      = "host"
      source    = "flotilla-server"
      read_only = false
    }
    task "server" {
      driver = "exec"
      config {
        command = "/usr/local/bin/flotilla"
        args    = ["server", "--config", "${NOMAD_TASK_DIR}/server.toml"]
      }
      volume_mount {
        volume      = "data"
        destination = "/var/lib/flotilla"
      }
      template {
        destination = "${NOMAD_TASK_DIR}/server.toml"
        data        = <<-EOT
          id = 3
          join = "{{ range nomadService `flotilla-server` }}{{ if eq .Port 7071 }}{{ .Address }}:7070{{ end }}{{ end }}"
          data_dir = "/var/lib/flotilla/server"
          grpc_addr = "{{ env `NOMAD_ADDR_grpc` }}"
          http_addr = "{{ env `NOMAD_ADDR_http` }}"
          tls_cert = "/etc/flotilla/tls/server-s3.pem"
          tls_key = "/etc/flotilla/tls/server-s3-key.pem"
          tls_ca = "/etc/flotilla/tls/ca.pem"
        EOT
      }
      resources {
        cpu    = 1000
        memory = 512
      }
    }
  }
}
